"""placeholder"""
def main():
    print("tinytx")
