"""MMF user dir: `mmf_run ... env.user_dir=$(deqfusion mmf-user-dir)` (or MMF_USER_DIR) imports this package,
which registers `deq`, MMF's own fusions, the `fusion_classifier` model and the `easy_vqa` dataset."""
import os
import sys

# MMF main imports a user dir by putting its parent first on sys.path; that parent is deqfusion's adapter folder,
# whose easy_vqa.py would then shadow the `easy_vqa` package (the data). Nothing else is imported from there.
_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _parent]

from deqfusion_adapters.mmf import register  # noqa: E402

register()
