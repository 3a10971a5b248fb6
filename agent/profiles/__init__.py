"""Device profiles (TOML data) and the pure matcher from probe facts to the best profile."""

from agent.profiles.match import Candidate, MatchResult, match_profile
from agent.profiles.schema import (
    BuildTarget,
    DeviceProfile,
    MatchRules,
    QualityBudget,
    Slo,
    default_profiles_dir,
    load_profile,
    load_profiles,
    normalize_arch,
)

__all__ = [
    "BuildTarget",
    "Candidate",
    "DeviceProfile",
    "MatchResult",
    "MatchRules",
    "QualityBudget",
    "Slo",
    "default_profiles_dir",
    "load_profile",
    "load_profiles",
    "match_profile",
    "normalize_arch",
]
