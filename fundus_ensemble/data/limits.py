"""How large a photo the project decodes, shared by every decoder (imaging, dicom)."""

# Decoding needs several bytes per pixel (a 20000 x 20000 PNG alone takes 2.4 GB decoded), and
# the largest fundus cameras make about 24 megapixels: refuse more than this before decoding.
DEFAULT_MAX_PIXELS = 100_000_000
