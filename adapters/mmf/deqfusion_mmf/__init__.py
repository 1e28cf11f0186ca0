"""MMF user dir: `mmf_run ... env.user_dir=$(deqfusion mmf-user-dir)` (or MMF_USER_DIR) imports this package,
which registers `deq`, MMF's own fusions, the `fusion_classifier` model and the `easy_vqa` dataset."""
from deqfusion_adapters.mmf import register

register()
