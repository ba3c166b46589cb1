"""Classification: the category taxonomy, the data map and regional routing."""
