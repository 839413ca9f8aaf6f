"""What a sandbox may do: the policy model, its keys, profiles and how it is resolved."""

from kernel_sandbox.policy.model import *  # noqa: F403
from kernel_sandbox.policy.model import __all__  # noqa: F401
