public enum ControllerVersion { public static let string = "0.1.0" }
