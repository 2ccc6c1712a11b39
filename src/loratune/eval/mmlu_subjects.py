"""The category of each of MMLU's 57 subjects (Hendrycks et al. 2021), for per-category averages.

The four categories are the paper's (STEM, humanities, social sciences, other), with the subject lists
lm-evaluation-harness groups its `mmlu_*` tasks by. A benchmark with other subjects names its own
categories in the task's `categories` setting.
"""

from __future__ import annotations

_GROUPS = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics", "computer_security",
        "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging", "management",
        "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}

MMLU_CATEGORIES: dict[str, str] = {subject: group for group, subjects in _GROUPS.items() for subject in subjects}


def category_of(subject: str, extra: dict[str, str]) -> str | None:
    """The subject's category: the task's own mapping first, then MMLU's; None when neither has it."""
    return extra.get(subject) or MMLU_CATEGORIES.get(subject)
