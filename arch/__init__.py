"""Architectures as data, in pure Python + pydantic (never torch, `service` or `worker`), so the web
process validates uploads with it and the engine builds its torch modules from the same tables:

- `arch.specs`: the pydantic specs of the base architectures (mlp, cnn, the named ones);
- `arch.tables`: the configuration tables of the named architectures (ResNets, VGG, MobileNetV2);
- `arch.layouts`: the layers of a base spec (walked from the tables) and the pruned widths that fit them;
- `arch.registry`: the channel-pruned spec, `architecture_adapter`, the `REGISTRY`, and for any spec its
  expected state dict, input shape and parameter count;
- `arch.mismatch`: why a weights file does not fit an architecture.
"""
