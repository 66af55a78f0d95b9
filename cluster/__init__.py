"""mixserve: expert-sharded serving of Mixtral-architecture MoE models on Ray."""

from cluster.engine import RequestOutput
from cluster.llm import LLM
from cluster.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
