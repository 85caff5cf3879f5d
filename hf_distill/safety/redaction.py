"""Credentials never leave the machine: what our arguments save, print or upload holds no token.

A token given in a dict argument (``teacher_model_init_kwargs={"token": ...}``) must stay usable in memory
(the teacher is loaded with it) but must not reach ``training_args.bin`` (which `Trainer` pickles into every
checkpoint and `push_to_hub` uploads), ``to_dict``/``to_json_string`` (logged by the reporting integrations)
or ``str(args)``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

REDACTED = "<redacted>"
# Keys whose string values are credentials: token, hub_token, use_auth_token, api_key, client_secret, ...
_SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|credentials?|authorization)$", re.IGNORECASE)


def is_secret_key(key: object) -> bool:
    """Whether a keyword's value is a credential (``token``, ``hub_token``, ``use_auth_token``, ``api_key``, ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY.search(key))


def redact_secrets(value: Any) -> Any:
    """A copy of ``value`` with every string under a secret key (at any depth of dicts, lists, tuples) replaced
    by ``"<redacted>"``; other values are shared, not copied."""
    if isinstance(value, dict):
        return {
            k: REDACTED if is_secret_key(k) and isinstance(v, str) else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact_secrets(v) for v in value)
    return value


class RedactedSecretsMixin:
    """For `TrainingArguments` subclasses: secrets stay in memory, never in pickles, dicts, JSON or ``str``.

    Pickling (``torch.save(args)``, as `Trainer` writes ``training_args.bin``) stores a redacted state, so a
    reloaded copy has ``"<redacted>"`` where the token was; ``copy.copy``/``copy.deepcopy`` keep the secrets.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # `@dataclass` gives each subclass a repr of every field unless the class defines one itself.
        cls.__repr__ = RedactedSecretsMixin.__str__  # type: ignore[method-assign]

    def __getstate__(self) -> dict[str, Any]:
        return redact_secrets(dict(self.__dict__))

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> Any:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def to_dict(self) -> dict[str, Any]:
        return redact_secrets(super().to_dict())  # type: ignore[misc]

    def __str__(self) -> str:
        fields = redact_secrets(self.to_dict())
        body = "".join(f"{k}={v},\n" for k, v in sorted(fields.items()))
        return f"{type(self).__name__}(\n{body})"

    __repr__ = __str__
