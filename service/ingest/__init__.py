"""Reading uploaded files as data, never as code; one module per format.

* ``safetensors``: model weights, validated by the safetensors library's own header parser, and the
  check that they fit the chosen architecture.
* ``torch_files``: PyTorch files told apart by content; TorchScript and torch.export archives are
  refused, a torch.save checkpoint is converted to safetensors by a resource-limited child process.
* ``npz`` and ``csv``: datasets, normalised to a :class:`~service.ingest.dataset.ParsedDataset`
  (``encoding`` holds the label and group coding both share) and stored by ``dataset.save_dataset``.

Every problem with the input raises :class:`~service.errors.InvalidInput` with a sentence that says
what is wrong and what to do about it. numpy and the standard library only at import: the web
process must never import torch.
"""
