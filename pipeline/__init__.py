"""kdqa: offline knowledge distillation for extractive question answering."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import pipeline` (and the CLI's --help) stays fast and torch-free.
    if name == "QuestionAnswerer":
        from pipeline.serving.qa import QuestionAnswerer

        return QuestionAnswerer
    if name == "KdqaError":
        from pipeline.runtime.errors import KdqaError

        return KdqaError
    raise AttributeError(name)


__all__ = ["KdqaError", "QuestionAnswerer", "__version__"]
