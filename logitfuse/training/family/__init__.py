"""The miniature model family: a synthetic world, its corpus, and the trainer that builds models/."""
