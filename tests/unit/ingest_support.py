"""What the service.ingest tests share."""

from __future__ import annotations

import pytest

from service.errors import InvalidInput

EXPORT_HINT = 'safetensors.torch.save_file(model.state_dict(), "model.safetensors")'


def invalid(fn, *args, **kwargs) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        fn(*args, **kwargs)
    return info.value
