"""deepvit-serve: the ``deepvit`` command joins the model side and the serving side."""
