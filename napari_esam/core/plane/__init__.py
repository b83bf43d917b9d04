"""One 2-D plane, SAM semantics: image rule, predictor, segment-everything, masks to
labels, object prompts."""
