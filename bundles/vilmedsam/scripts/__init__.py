"""Simple-ViLMedSAM bundle code (method-specific only; shared code lives in the ``vlseg`` package)."""

from .alignment import AlignmentHead, alignment_loss
from .augment import M2IBAugmentBatch
from .clip import CLIPTowers, build_clip, check_clip_tokenizer
from .decoder import BidirectionalInteractionDecoder, MapEncoder, affinity_refine
from .m2ib import M2IBPrompter, m2ib_capacity, resize_minmax, saliency_from_capacity
from .network import SimpleViLMedSAM
from .sam_encoder import LoRAQV, apply_lora, build_sam_image_encoder, load_sam_weights, sam_key_map

__all__ = [
    "AlignmentHead", "alignment_loss", "M2IBAugmentBatch", "CLIPTowers", "build_clip", "check_clip_tokenizer",
    "BidirectionalInteractionDecoder", "MapEncoder", "affinity_refine", "M2IBPrompter", "m2ib_capacity",
    "resize_minmax", "saliency_from_capacity", "SimpleViLMedSAM", "LoRAQV", "apply_lora", "build_sam_image_encoder",
    "load_sam_weights", "sam_key_map",
]
