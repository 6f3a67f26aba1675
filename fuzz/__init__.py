"""Coverage-guided fuzzing of qmig's parsers (atheris): ``python -m fuzz``, ``make fuzz``."""
