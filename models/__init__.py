"""TensorFlow/Keras models: image encoders and the LSTM captioner."""

from models import quiet

quiet.install()  # before any of these modules imports TensorFlow, in the driver and in Spark's workers
