"""Simple-ViLMedSAM bundle code (method-specific only; shared code lives in the ``vlseg`` package)."""

from .decoder import BidirectionalInteractionDecoder, MapEncoder, affinity_refine
from .m2ib import CLIPTowers, M2IBPrompter, build_clip, m2ib_capacity, saliency_from_capacity
from .network import SimpleViLMedSAM
from .sam_encoder import LoRAQV, apply_lora, build_sam_image_encoder, load_sam_encoder_weights

__all__ = [
    "BidirectionalInteractionDecoder", "MapEncoder", "affinity_refine", "CLIPTowers", "M2IBPrompter", "build_clip",
    "m2ib_capacity", "saliency_from_capacity", "SimpleViLMedSAM", "LoRAQV", "apply_lora", "build_sam_image_encoder",
    "load_sam_encoder_weights",
]
