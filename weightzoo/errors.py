"""User errors: one small family the CLI prints in one line. Anything else is a bug and keeps its traceback.

Each class also derives from the built-in it refines (``ValueError``, ``FileNotFoundError``, ``OSError``),
so callers that catch the built-in keep working.
"""

from __future__ import annotations


class WeightzooError(Exception):
    """Something the user can fix: bad input, a missing dataset, a refused mix. Printed without a traceback."""


class InputError(WeightzooError, ValueError):
    """A bad argument, manifest, id, config or file that was given to weightzoo."""


class NotFoundError(WeightzooError, FileNotFoundError):
    """A dataset, model, file or id that is not where the user said it is."""


class RecipeMismatchError(WeightzooError, ValueError):
    """Rows of another recipe (layout, base model, fine-tune config) were about to be mixed into a dataset."""


class CorruptShardError(WeightzooError, OSError):
    """A committed shard (or ledger file) is not what its ledger entry says: missing, resized or changed."""


class StorageError(WeightzooError, OSError):
    """A dataset's storage cannot be used: unreachable endpoint, refused credentials, no such bucket."""


# An id, URI or value quoted in a message is cut to this many characters: a 10,000-character id echoed
# in every line of an error made it 52 KB.
QUOTE_LIMIT = 80


def short(text: object, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as a string of at most ``limit`` characters, its middle cut to an ellipsis (its start and
    end are what tell two ids apart), with the full length said, for quoting in messages."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = limit - 1
    return f"{text[: keep - keep // 3]}…{text[len(text) - keep // 3:]} ({len(text):,} chars)"
