"""Architectures as data, in pure Python + pydantic (never torch, `service` or `worker`), so the web
process validates uploads with it and the engine builds its torch modules from the same tables:

- `arch.specs`: the pydantic specs a model upload names, `architecture_adapter`, the `REGISTRY`;
- `arch.tables`: the configuration tables of the named architectures (ResNets, VGG, MobileNetV2);
- `arch.layouts`: each spec's expected state dict (walked from the tables), input shape, parameter count;
- `arch.mismatch`: why a weights file does not fit an architecture.
"""
