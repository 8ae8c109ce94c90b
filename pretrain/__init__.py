"""ssl-pretrain: self-supervised pretraining of visual encoders. ``pretrain.load_encoder(run_dir)`` gives a finished
run's encoder, with its preprocessing, for use in your own code (pretrain.encoder)."""


def __getattr__(name: str):
    if name in ("load_encoder", "Encoder"):  # lazily: the CLI starts without importing torch
        from pretrain import encoder

        return getattr(encoder, name)
    raise AttributeError(f"module 'pretrain' has no attribute {name!r}")
