"""The rank analyses of the LoRA paper (§7) and seed 003, one job per module.

- :mod:`.similarity`: subspace similarity φ between two adapters (§7.2, Figure 3);
- :mod:`.amplification`: how ΔW amplifies directions of W (§7.3, Table 7);
- :mod:`.spectrum`: singular values of a full fine-tune's ΔW and the rank keeping 90/95/99%;
- :mod:`.extract`: a PEFT-format LoRA adapter from the truncated SVD of a full fine-tune;
- :mod:`.weights`: where the matrices come from (models, adapter files), always ``(out, in)``;
- :mod:`.summary`: what an adapter folder holds, read without its base (``lorakit inspect ADAPTER``).

Each takes plain tensors first; the ``adapter_*`` / ``model_*`` / ``extract_adapter``
functions take folders or models and are what the CLI calls.
"""

from lorakit.analysis.amplification import Amplification, adapter_amplification, amplification
from lorakit.analysis.extract import Extraction, ExtractedModule, extract_adapter, extract_lora, save_extraction
from lorakit.analysis.similarity import (
    ModuleSimilarity, adapter_similarity, compare_adapters, random_baseline, subspace_similarity,
)
from lorakit.analysis.spectrum import DEFAULT_ENERGIES, DeltaSpectrum, delta_spectrum, model_spectra
from lorakit.analysis.summary import AdapterSummary, ModuleSummary, adapter_summary

__all__ = [
    "AdapterSummary", "Amplification", "DEFAULT_ENERGIES", "DeltaSpectrum", "ExtractedModule", "Extraction",
    "ModuleSimilarity", "ModuleSummary", "adapter_amplification", "adapter_similarity", "adapter_summary",
    "amplification", "compare_adapters", "delta_spectrum", "extract_adapter", "extract_lora", "model_spectra",
    "random_baseline", "save_extraction", "subspace_similarity",
]
