"""What every layer of zorro_models may use: error lines (``errors``) and tables, plots and metric files
(``reporting``)."""
