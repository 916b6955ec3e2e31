print("svsp-ctl")
