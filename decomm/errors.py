"""The one exception type decomm raises for misuse and communication failures."""


class DecommError(RuntimeError):
    """A decomm call failed: ranks disagreed, a neighbour never arrived, or bad input.

    The message names the op, the tensor name, this rank, and the ranks and
    fields involved (shape, dtype, topology round, ...).
    """
