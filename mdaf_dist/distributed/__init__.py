"""Everything below imports torch and torchrec: the pinned stack is checked (and its known
harmless warnings muted) first."""

from mdaf_dist.pinned import check_versions, mute_known_warnings

check_versions()
mute_known_warnings()
