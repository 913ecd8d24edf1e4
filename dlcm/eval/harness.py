"""Adapter that lets EleutherAI's lm-evaluation-harness drive a dlcm checkpoint (optional extra ``harness``).

Installed with ``pip install -e '.[harness]'``. Importing this module registers the model as ``dlcm``; lm_eval has
no plugin discovery for models, so the stock ``lm_eval`` command cannot see it. Run the harness through this module
instead, with the harness's own arguments::

    python -m dlcm.eval.harness --model dlcm \\
        --model_args config=recipes/dlcm_tiny_r4_defaultcorpus_cpu.yaml,checkpoint=runs/…/last.ckpt \\
        --tasks hellaswag,arc_easy --device cuda --batch_size 16

or from Python: ``import dlcm.eval.harness`` then ``lm_eval.simple_evaluate(model="dlcm", model_args=…)``, or
``simple_evaluate(model=DLCMHarnessLM.from_network(network, tokenizer, context_length), …)``.

The three request types run on dlcm's own machinery, so the harness and ``dlcm eval`` give identical scores for
the same ``(context, continuation)`` pairs (``tests/eval/test_harness.py`` checks it on a local task):

- ``loglikelihood``: :func:`dlcm.eval.scoring.score_requests` (packed, one document per request; the
  continuation is whatever the joint encoding adds after the context, left-truncated to the context length).
  dlcm models have no start-of-document token, so an empty context is an error.
- ``loglikelihood_rolling``: the harness's rolling windows of ``context_length`` tokens, scored the same way. The
  document's first token conditions the rest and is itself not scored (there is no token to predict it from).
- ``generate_until``: batched incremental decoding (:func:`dlcm.infer.generation.generate_batch`), prompts
  left-truncated to leave room for ``max_gen_toks`` (the harness's convention), cut at the first ``until`` string.

Metric conventions differ from ``dlcm eval`` in one place: the harness's ``acc_norm`` divides by the *characters*
of the choice without the target delimiter, ``dlcm eval`` by the UTF-8 bytes of the continuation including its
leading space; they agree when a task puts the space in the choices and sets ``target_delimiter: ""``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from dlcm.data.tokenizer import encode_documents
from dlcm.eval.scoring import Request, encode_request, score_requests
from dlcm.infer.generation import check_sampling, first_stop, fit_to_context, generate_batch

GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_GEN_BATCH = 16


@register_model("dlcm")
class DLCMHarnessLM(LM):
    """lm_eval ``LM`` over a DLCM or dense-baseline network, its tokenizer and its training context length.

    ``checkpoint`` is a checkpoint or an exported folder and ``config`` an optional recipe (initial weights, or a
    format version 0 checkpoint), both loaded exactly as ``dlcm eval`` loads them. ``batch_tokens`` packs scoring
    requests; ``batch_size`` (the harness's option) is the number of prompts decoded together (``auto`` →
    16). ``device`` and ``dtype`` place the network.
    """

    def __init__(
        self,
        config: str | None = None,
        checkpoint: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_tokens: int = 8192,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from dlcm.infer.generate_cli import dtype_of
        from dlcm.infer.load import load_for_command

        torch_dtype = dtype_of(dtype)  # checks the name before anything is built
        if config is None and checkpoint is None:
            raise ValueError("model_args needs checkpoint=<last.ckpt or exported folder> for --model dlcm")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_for_command(config.split(":") if config else None, checkpoint, device, torch_dtype)
        network, tokenizer = model.network, model.tokenizer
        self._setup(network, tokenizer, model.context_length, batch_tokens, batch_size, max_batch_size)

    @classmethod
    def from_network(
        cls,
        network: nn.Module,
        tokenizer: Tokenizer,
        context_length: int,
        batch_tokens: int = 8192,
        batch_size: int | str | None = None,
    ) -> DLCMHarnessLM:
        """An adapter over an in-memory network (e.g. ``module.network`` of a trained LightningModule)."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._setup(network, tokenizer, context_length, batch_tokens, batch_size, None)
        return lm

    def _setup(
        self,
        network: nn.Module,
        tokenizer: Tokenizer,
        context_length: int,
        batch_tokens: int,
        batch_size: int | str | None,
        max_batch_size: int | None,
    ) -> None:
        if batch_size in (None, "auto"):
            batch_size = max_batch_size or DEFAULT_GEN_BATCH
        elif not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size!r} is not allowed: a positive integer or 'auto'")
        self.network = network.eval()
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.batch_tokens = batch_tokens
        self.gen_batch_size = int(batch_size)
        self._device = next(network.parameters()).device

    # --- log-likelihoods ---------------------------------------------------------------------------------------

    def _score(self, requests: Sequence[Request], disable_tqdm: bool) -> list[tuple[float, bool]]:
        scores = score_requests(self.network, requests, self.batch_tokens, progress=not disable_tqdm)
        return [(s.loglik, s.is_greedy) for s in scores]

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        encoded = []
        for request in requests:
            context, continuation = request.args
            if not context:
                raise ValueError(
                    f"empty context before continuation {continuation[:40]!r}: dlcm models have no start-of-document "
                    "token, so the first token of a text cannot be scored"
                )
            encoded.append(encode_request(self.tokenizer, context, continuation, self.context_length))
        results = self._score(encoded, disable_tqdm)
        for request, result in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows: list[Request] = []
        owner: list[int] = []
        for i, request in enumerate(requests):
            (text,) = request.args
            ids = encode_documents(self.tokenizer, [text])[0]
            if not ids:
                continue
            # The first token is the prefix the windows condition on (the harness would use a BOS/EOS token).
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(ids[1:], ids[0], self.context_length, 1),
            ):
                windows.append(Request(tuple(context + continuation), len(continuation)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (loglik, _) in zip(owner, self._score(windows, disable_tqdm), strict=True):
            totals[i] += loglik
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation --------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)  # one batch per set of options
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generating")
        for indices in groups.values():
            options = generation_options(requests[indices[0]].args[1])
            stops = options.pop("until")
            max_new = options.pop("max_gen_toks")
            for first in range(0, len(indices), self.gen_batch_size):
                batch = indices[first : first + self.gen_batch_size]
                texts = [requests[i].args[0] for i in batch]
                ids = fit_to_context(encode_documents(self.tokenizer, texts), max_new, self.context_length, True)
                news = generate_batch(self.network, ids, max_new, should_stop=self._stopper(stops), **options)
                for i, new in zip(batch, news, strict=True):
                    text = self.tokenizer.decode(new)
                    cut = first_stop(text, stops)
                    results[i] = text if cut < 0 else text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]  # every index is filled above

    def _stopper(self, stops: list[str]) -> Callable[[int, list[int]], bool] | None:
        """``should_stop`` of :func:`generate_batch`: the decoded new text holds one of ``stops``."""
        return (lambda _, new: first_stop(self.tokenizer.decode(new), stops) >= 0) if stops else None


def generation_options(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The harness's ``gen_kwargs`` as :func:`generate_batch` options plus ``until`` (list) and ``max_gen_toks``.

    ``do_sample=False`` (the default) is greedy whatever the temperature; ``do_sample=True`` without a temperature
    samples at 1. Unknown keys are an error naming the allowed ones.
    """
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise ValueError(f"gen_kwargs {unknown} are not supported by the dlcm model: allowed {', '.join(GEN_KWARGS)}")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample", False) else 0.0
    top_k, top_p = gen_kwargs.get("top_k"), gen_kwargs.get("top_p")
    check_sampling(temperature, top_k, top_p)
    return {
        "until": until,
        "max_gen_toks": int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
    }


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
