"""Training data: manifests and dataset readers -> Samples; preprocessing -> a tensor cache."""
from .manifest import TASKS, Invalid, Sample, read_manifest, write_manifest
from .readers import open_source, read_corpus, read_voiceassistant
from .snac_codes import codebooks_from_frames, format_snac_string, frames_from_codebooks, parse_snac_string

__all__ = ["TASKS", "Invalid", "Sample", "read_manifest", "write_manifest", "open_source", "read_corpus",
           "read_voiceassistant", "codebooks_from_frames", "format_snac_string", "frames_from_codebooks",
           "parse_snac_string"]
