"""genai-orchestrator: pipelines of GenAI stages as DAGs on Ray, tracked in MLflow."""

__version__ = "0.1.0"
