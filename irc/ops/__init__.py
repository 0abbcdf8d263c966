"""Custom ops (``irc::token_gather``, ``irc::token_scatter``): definition, fake, reference, kernels."""

# Importing the modules registers the ops under torch.ops.irc; token_gather's and
# token_scatter's backwards call each other, so both are always registered together.
from irc.ops.token_gather import token_gather
from irc.ops.token_scatter import token_scatter

__all__ = ["token_gather", "token_scatter"]
