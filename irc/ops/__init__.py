"""Custom ops (``irc::token_gather``, ``irc::token_scatter``): definition, fake, reference, kernels."""
