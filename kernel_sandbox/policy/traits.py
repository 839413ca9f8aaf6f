"""The policy keys as traitlets traits, generated from the policy table.

:class:`PolicyTraits` is a mixin of ``DockerSandboxProvisioner``: one configurable trait per
policy key, so ``c.DockerSandboxProvisioner.memory_limit = "4g"`` works in Jupyter config.
Every trait is ``None`` until set (the profile and the strict defaults fill in the rest) and
takes any value: the policy's own parsers validate it, with messages that name the key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from traitlets import Any as AnyTrait
from traitlets import HasTraits, MetaHasTraits

from kernel_sandbox.policy.keys import POLICY_KEYS

__all__ = ["PolicyTraits"]


def _policy_traits_class() -> type[HasTraits]:
    namespace: dict[str, Any] = {
        key.name: AnyTrait(None, allow_none=True, config=True, help=key.help) for key in POLICY_KEYS
    }
    namespace["__module__"] = __name__
    namespace["__doc__"] = "One configurable trait per policy key (None: not set here)."
    return cast("type[HasTraits]", MetaHasTraits("PolicyTraits", (HasTraits,), namespace))


if TYPE_CHECKING:  # made at run time; to a type checker an untyped base, as jupyter_client's
    PolicyTraits: Any
else:
    PolicyTraits = _policy_traits_class()
