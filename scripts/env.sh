# Environment for the CPU vLLM engine on small machines; sourced by the scripts.
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
# The checkout's scripts keep their models in ./models (prepared once by setup.sh); elsewhere the default is the
# per-user cache ($XDG_CACHE_HOME/rbr-serve/models). An RBR_MODELS_DIR set before wins.
export RBR_MODELS_DIR=${RBR_MODELS_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/models}
