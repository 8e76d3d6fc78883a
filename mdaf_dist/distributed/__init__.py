"""Everything below imports torch and torchrec: the pinned versions are checked first."""

from mdaf_dist.versions import check_versions

check_versions()
