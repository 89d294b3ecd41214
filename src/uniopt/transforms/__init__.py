"""Building blocks that are not whole optimizers; chain them with :func:`uniopt.chain`.

Each block maps the incoming update ``u`` (at the head of a chain, the gradient) to an outgoing
one; the parameter moves by ``p <- p - u`` at the end of the chain. One file per idea: scaling,
decay, momentum, clipping, centralization, noise, averaging, the plateau schedule.
"""
