"""Trained models in the forms they are served in: MLflow pyfunc models, checkpoint conversion, and the Ray-free half
of the Serve application (`serve/app.py` holds the deployments)."""
