"""Everything below imports torch and torchrec: the pinned stack is checked (its known harmless
warnings muted, its large CPU tensors put on huge pages) first."""

from mdaf_dist.pinned import check_versions, mute_known_warnings, use_huge_pages

check_versions()
mute_known_warnings()
use_huge_pages()
