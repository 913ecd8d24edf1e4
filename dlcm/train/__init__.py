"""Training: LightningModules, the ``dlcm fit`` CLI, optimizer and schedules, execution (compile, activation
checkpointing, FSDP2), meta-device materialisation, checkpoint IO, consolidation and restoring a trained module."""
