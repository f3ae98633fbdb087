"""kdqa: offline knowledge distillation for extractive question answering."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import pipeline` (and the CLI's --help) stays fast and torch-free.
    if name == "QuestionAnswerer":
        from pipeline.serving.qa import QuestionAnswerer

        return QuestionAnswerer
    raise AttributeError(name)


__all__ = ["QuestionAnswerer", "__version__"]
