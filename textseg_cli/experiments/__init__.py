"""`textseg experiment`: method × labeled × seed grids, restartable runs, launchers, presets and tables."""
