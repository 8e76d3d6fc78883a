"""The tables' backward on CPU: fbgemm's kernel for non-pooled lookups with row-wise Adagrad
(``fbgemm::split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu``) replaced by ours
(``csrc/embedding_backward_cpu.cpp``), which gives the same weights and momentum, bit for bit.

fbgemm's CPU kernel for non-pooled lookups (an EmbeddingCollection's, as every model here has)
sums each id's gradient in nested hash maps, about 2 us per id: on the paper config the history
lookup's ~77k ids made it 10-15 % of a CPU training step. Ours sorts the ids by row instead and
updates the rows in parallel. fbgemm's autograd reaches the op through the dispatcher, so
registering our kernel for it (after fbgemm's, since the last registration wins) is the whole
change: tables, state_dict keys and checkpoints are fbgemm's and TorchRec's as before.
"""

from __future__ import annotations

import functools
import sys

from mdaf_dist.models import cpu_kernels


@functools.cache
def install() -> bool:
    """Make our kernel fbgemm's, once per process; where the kernels cannot be built, say why in
    one line and keep fbgemm's (False)."""
    import fbgemm_gpu  # noqa: F401  (registers fbgemm's kernels, which ours must come after)

    try:
        ops = cpu_kernels.load()
    except cpu_kernels.ExtensionUnavailable as error:
        print(f"mdaf_dist: fused CPU kernels unavailable ({error}); the tables' backward is fbgemm's", file=sys.stderr)
        return False
    ops.override_fbgemm_nobag_rowwise_adagrad()  # mutes the dispatcher's warning about it
    return True
