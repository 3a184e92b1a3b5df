"""placeholder"""
def check_available(device):
    pass
