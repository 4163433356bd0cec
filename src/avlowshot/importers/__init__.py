"""Import the authors' released run folders (AVCA, TCAF, ClipClap-GZSL, AV-DIFF) as avlowshot run directories."""

from avlowshot.importers.loading import ReferenceImportError, load_args_pickle, load_reference_checkpoint
from avlowshot.importers.references import REFERENCES, map_state_dict
from avlowshot.importers.run import import_run

__all__ = [
    "REFERENCES",
    "ReferenceImportError",
    "import_run",
    "load_args_pickle",
    "load_reference_checkpoint",
    "map_state_dict",
]
