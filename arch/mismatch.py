"""Why a weights file does not fit an architecture, in the same words wherever it is checked: the web
process on a safetensors header at upload time, the worker on the tensors it loads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# How many names a message lists before it counts the rest.
MISMATCHES_LISTED = 5

# Names → (shape, dtype kind), from a layout, a safetensors header or a torch state dict.
Tensors = Mapping[str, tuple[Sequence[int], str]]


@dataclass(frozen=True)
class WeightsMismatch:
    """Why a weights file does not fit an architecture: one sentence for people, and one entry per
    key for programs ({"key", "problem": "missing" | "unexpected" | "shape_mismatch" |
    "kind_mismatch", ...})."""

    message: str
    errors: list[dict]


@dataclass(frozen=True)
class _Differences:
    missing: list[str]
    unexpected: list[str]
    shape_bad: list[str]
    kind_bad: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shape_bad or self.kind_bad)


def state_dict_mismatch(architecture: str, expected: Tensors, found: Tensors) -> WeightsMismatch | None:
    """What keeps `found` (a weights file's names → (shape, dtype kind)) from loading into
    `expected`, or None when it fits. Pure, so the web process checks a safetensors header at upload
    time with the same words the worker uses when it loads the tensors."""
    differences = _Differences(
        missing=[key for key in expected if key not in found],
        unexpected=[key for key in found if key not in expected],
        shape_bad=[key for key in expected if key in found and list(found[key][0]) != list(expected[key][0])],
        kind_bad=[key for key in expected if key in found and found[key][1] != expected[key][1]],
    )
    if not differences:
        return None
    message = f"weights do not fit architecture {architecture}: " + "; ".join(_parts(differences, expected, found))
    return WeightsMismatch(message, _errors(differences, expected, found))


def _parts(differences: _Differences, expected: Tensors, found: Tensors) -> list[str]:
    """The clauses of the message: missing and unexpected keys, then the first shape and dtype
    mismatches, then a hint about a prefix."""
    missing, unexpected = differences.missing, differences.unexpected
    shape_bad, kind_bad = differences.shape_bad, differences.kind_bad
    parts: list[str] = []
    if missing:
        parts.append(f"{_keys_are(len(missing))} missing from the file: {_listing(missing)}")
    if unexpected:
        parts.append(f"{_keys_are(len(unexpected))} not part of the architecture: {_listing(unexpected)}")
    parts += [
        f"{key} has shape {_shape(found[key][0])}, the architecture expects {_shape(expected[key][0])}"
        for key in shape_bad[:MISMATCHES_LISTED]
    ]
    if len(shape_bad) > MISMATCHES_LISTED:
        parts.append(f"and {len(shape_bad) - MISMATCHES_LISTED} more shape mismatches")
    parts += [
        f"{key} is {_a(found[key][1])} tensor, the architecture expects {_a(expected[key][1])} tensor"
        for key in kind_bad[:MISMATCHES_LISTED]
    ]
    if len(kind_bad) > MISMATCHES_LISTED:
        parts.append(f"and {len(kind_bad) - MISMATCHES_LISTED} more dtype mismatches")
    hint = _prefix_hint(missing, unexpected)
    if hint:
        parts.append(hint)
    return parts


def _errors(differences: _Differences, expected: Tensors, found: Tensors) -> list[dict]:
    """One entry per key (every key, not only those the message lists)."""
    errors: list[dict] = [
        {"key": key, "problem": "missing", "expected_shape": list(expected[key][0]), "expected_kind": expected[key][1]}
        for key in differences.missing
    ]
    errors += [
        {"key": key, "problem": "unexpected", "shape": list(found[key][0]), "kind": found[key][1]}
        for key in differences.unexpected
    ]
    errors += [
        {
            "key": key,
            "problem": "shape_mismatch",
            "shape": list(found[key][0]),
            "expected_shape": list(expected[key][0]),
        }
        for key in differences.shape_bad
    ]
    errors += [
        {"key": key, "problem": "kind_mismatch", "kind": found[key][1], "expected_kind": expected[key][1]}
        for key in differences.kind_bad
    ]
    return errors


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str | None:
    """If the file's keys are the architecture's keys with an extra (or absent) leading component,
    such as DataParallel's "module.", say so."""

    def probe(longer: list[str], shorter: list[str]) -> str | None:
        if not longer or not shorter:
            return None
        prefix = longer[0].split(".", 1)[0] + "."
        stripped = {key[len(prefix) :] for key in longer if key.startswith(prefix)}
        if len(stripped) == len(longer) and set(shorter) <= stripped:
            return prefix
        return None

    prefix = probe(unexpected, missing)
    if prefix:
        return (
            f"every key in the file starts with {prefix!r} (a wrapper such as DataParallel?): save the "
            f"inner model's state_dict, or strip the {prefix!r} prefix from the keys"
        )
    prefix = probe(missing, unexpected)
    if prefix:
        return (
            f"the architecture's keys start with {prefix!r} but the file's do not: add the {prefix!r} "
            "prefix to the keys, or pick the architecture that matches the saved module"
        )
    return None


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _keys_are(n: int) -> str:
    return f"{n} key is" if n == 1 else f"{n} keys are"


def _listing(keys: list[str]) -> str:
    more = len(keys) - MISMATCHES_LISTED
    return ", ".join(keys[:MISMATCHES_LISTED]) + (f" and {more} more" if more > 0 else "")
