"""The built-in vision-language dataset: procedural scenes, its tasks and splits, the cached ArrayRecord build."""
