"""Flax BERT, Hugging Face checkpoint loading, the multi-task head and the recommender."""

from crossrec_jax.models.bert import BertConfig, BertEncoder
from crossrec_jax.models.heads import MultiTaskHead
from crossrec_jax.models.hf import (DEFAULT_CHECKPOINT, CheckpointError, load_bert,
                                    load_bert_config, load_tokenizer, resolve_checkpoint)
from crossrec_jax.models.recommender import (CrossDomainRecommender, DomainSpec,
                                             RecommenderConfig)

__all__ = [
    "BertConfig", "BertEncoder", "MultiTaskHead", "DEFAULT_CHECKPOINT", "CheckpointError",
    "load_bert", "load_bert_config", "load_tokenizer", "resolve_checkpoint",
    "CrossDomainRecommender", "DomainSpec", "RecommenderConfig",
]
