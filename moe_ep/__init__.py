"""moe_ep: Mixture-of-Experts expert-parallel dispatch and combine."""

__version__ = "0.1.0"
