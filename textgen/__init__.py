"""textgen: text generation with discrete flow matching (section 8.1 and Appendix E.1 of the KO-DFM paper).

Data flows: text -> GPT-2 ids (+ MASK) -> packed chunks -> ``path.sample`` -> DiT -> mixture-path ELBO;
and for generation: ``sample(model, path, velocity, clamped prompt)`` -> ids -> text.

* :mod:`textgen.tokenizer`   GPT-2 BPE plus the MASK id (vocabulary 50,258)
* :mod:`textgen.data`        corpora, detokenisers, token cache, packing
* :mod:`textgen.path`        mask and eq 38 data-statistics sources, linear / KO schedulers
* :mod:`textgen.model`       the posterior DiT and the autoregressive baseline (same backbone)
* :mod:`textgen.checkpoint`  safetensors export / load with the path's source PMF
* :mod:`textgen.train`       training glue over :func:`dfm_core.training.train`
* :mod:`textgen.generate`    sampling with prompts and infilling
* :mod:`textgen.evaluate`    ELBO perplexity table (fair ELBO, E.1), AR exact perplexity, sample quality
* :mod:`textgen.judge`       judge models for generative perplexity
"""

from textgen.checkpoint import TextModel, export_text_model
from textgen.data import EVAL_CORPORA, TRAIN_CORPORA, load_corpora, pack
from textgen.evaluate import EvaluationReport, evaluate, sample_quality, sequence_nats, unigram_entropy
from textgen.generate import generate_texts, generate_tokens, parse_template
from textgen.model import TextARModel, TextDiT, TextModelConfig, build_model
from textgen.path import PAPER_BETA0, TextPathConfig, build_path, stats_source, text_source
from textgen.tokenizer import EOT_ID, MASK_ID, VOCAB_SIZE, TextTokenizer
from textgen.train import TextgenTrainConfig, prepare_data, train_text_model

__all__ = [
    "EOT_ID",
    "EVAL_CORPORA",
    "MASK_ID",
    "PAPER_BETA0",
    "TRAIN_CORPORA",
    "VOCAB_SIZE",
    "EvaluationReport",
    "TextARModel",
    "TextDiT",
    "TextModel",
    "TextModelConfig",
    "TextPathConfig",
    "TextTokenizer",
    "TextgenTrainConfig",
    "build_model",
    "build_path",
    "evaluate",
    "export_text_model",
    "generate_texts",
    "generate_tokens",
    "load_corpora",
    "pack",
    "parse_template",
    "prepare_data",
    "sample_quality",
    "sequence_nats",
    "stats_source",
    "text_source",
    "train_text_model",
    "unigram_entropy",
]
