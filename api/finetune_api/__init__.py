"""The FineTuneJob API: pydantic models shared by the operator, the trainer and the CLI."""

from .constants import API_VERSION, GROUP, KIND, PLURAL, VERSION, ExitCode, Phase, Reason
from .resource import FineTuneJob, ManifestError, parse_job, parse_spec
from .spec import FineTuneJobSpec
from .status import Artifact, FineTuneJobStatus, Manifest, TerminationMessage

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Artifact",
    "ExitCode",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "Manifest",
    "ManifestError",
    "Phase",
    "Reason",
    "TerminationMessage",
    "parse_job",
    "parse_spec",
]
