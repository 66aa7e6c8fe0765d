//! Which optional request parameters a model server takes: the field for the token cap, a
//! temperature, usage in streams. First guessed from the endpoint and the model's name, then
//! learned from the server's refusals.

/// The request field that carries the token cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapField {
    /// `max_tokens`: what OpenAI-compatible servers have always taken.
    MaxTokens,
    /// `max_completion_tokens`: what OpenAI takes, and its newer models require.
    MaxCompletionTokens,
}

/// What requests to one model may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    /// Where the token cap goes.
    pub cap_field: CapField,
    /// Whether a temperature may be sent.
    pub temperature: bool,
    /// Whether a stream may ask for usage (`stream_options: {include_usage: true}`).
    pub stream_usage: bool,
}

/// The parameters a refusal can name that a retry can do without.
const ADJUSTABLE: [&str; 4] = [
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "stream_options",
];

/// Words with which servers say a parameter is not taken, as opposed to badly valued.
const REFUSALS: [&str; 5] = [
    "unsupported",
    "not supported",
    "unrecognized",
    "unknown",
    "not permitted",
];

impl Dialect {
    /// The first guess for `model` at `base_url` (unset: OpenAI's): OpenAI's own endpoint gets
    /// `max_completion_tokens`, any other `max_tokens`; known reasoning models get no temperature.
    pub fn guess(base_url: Option<&str>, model: &str) -> Dialect {
        let cap_field = if base_url.is_none_or(is_openai) {
            CapField::MaxCompletionTokens
        } else {
            CapField::MaxTokens
        };
        Dialect {
            cap_field,
            temperature: !is_reasoning_model(model),
            stream_usage: true,
        }
    }

    /// The dialect that avoids the refused `parameter`, or `None` when it has nothing to change.
    pub fn without(self, parameter: &str) -> Option<Dialect> {
        let changed = match parameter {
            "max_tokens" if self.cap_field == CapField::MaxTokens => Dialect {
                cap_field: CapField::MaxCompletionTokens,
                ..self
            },
            "max_completion_tokens" if self.cap_field == CapField::MaxCompletionTokens => Dialect {
                cap_field: CapField::MaxTokens,
                ..self
            },
            "temperature" if self.temperature => Dialect {
                temperature: false,
                ..self
            },
            "stream_options" if self.stream_usage => Dialect {
                stream_usage: false,
                ..self
            },
            _ => return None,
        };
        Some(changed)
    }
}

/// The adjustable parameter that an error answer says the server does not take: the answer's
/// `param`, or else the first such parameter its message names. `None` for any other error.
pub fn refused_parameter(
    status: u16,
    param: Option<&str>,
    code: Option<&str>,
    message: &str,
) -> Option<&'static str> {
    if status != 400 && status != 422 {
        return None;
    }
    let lower = message.to_ascii_lowercase();
    let refusal = matches!(code, Some("unsupported_parameter" | "unsupported_value"))
        || REFUSALS.iter().any(|word| lower.contains(word));
    if !refusal {
        return None;
    }
    match param {
        Some(param) => ADJUSTABLE.into_iter().find(|name| *name == param),
        None => ADJUSTABLE
            .into_iter()
            .filter_map(|name| lower.find(name).map(|at| (at, name)))
            .min()
            .map(|(_, name)| name),
    }
}

/// Whether `base_url` is OpenAI's own API.
fn is_openai(base_url: &str) -> bool {
    reqwest::Url::parse(base_url).is_ok_and(|url| url.host_str() == Some("api.openai.com"))
}

/// Whether `model` is one of OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...), which take
/// no temperature but their default. A provider prefix such as `openai/` is ignored.
pub fn is_reasoning_model(model: &str) -> bool {
    let name = model
        .rsplit('/')
        .next()
        .unwrap_or(model)
        .to_ascii_lowercase();
    let o_series = ["o1", "o3", "o4"].iter().any(|family| {
        name.strip_prefix(family)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    });
    o_series || (name.starts_with("gpt-5") && !name.contains("-chat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_gets_max_completion_tokens_and_others_max_tokens() {
        let openai = Dialect::guess(None, "gpt-4o");
        assert_eq!(openai.cap_field, CapField::MaxCompletionTokens);
        assert!(openai.temperature && openai.stream_usage);
        let explicit = Dialect::guess(Some("https://api.openai.com/v1"), "gpt-4o");
        assert_eq!(explicit, openai);
        let ollama = Dialect::guess(Some("http://127.0.0.1:11434/v1"), "llama3");
        assert_eq!(ollama.cap_field, CapField::MaxTokens);
        assert!(ollama.temperature);
    }

    #[test]
    fn reasoning_models_are_known_by_name() {
        for model in [
            "o1",
            "o1-mini",
            "o3-mini",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5.1",
            "openai/o3-mini",
            "O3",
        ] {
            assert!(is_reasoning_model(model), "{model}");
        }
        for model in [
            "gpt-4",
            "gpt-4o",
            "gpt-4.1-mini",
            "gpt-5-chat-latest",
            "llama3",
            "o1x",
            "qwen3:o3",
        ] {
            assert!(!is_reasoning_model(model), "{model}");
        }
        assert!(!Dialect::guess(None, "o3-mini").temperature);
    }

    #[test]
    fn each_refusal_changes_one_thing_once() {
        let start = Dialect::guess(Some("http://127.0.0.1/v1"), "m");
        let cap = start.without("max_tokens").unwrap();
        assert_eq!(cap.cap_field, CapField::MaxCompletionTokens);
        assert_eq!(cap.without("max_tokens"), None);
        assert_eq!(
            cap.without("max_completion_tokens").unwrap().cap_field,
            CapField::MaxTokens
        );
        let cold = cap.without("temperature").unwrap();
        assert!(!cold.temperature && cold.cap_field == CapField::MaxCompletionTokens);
        assert_eq!(cold.without("temperature"), None);
        assert!(!start.without("stream_options").unwrap().stream_usage);
        assert_eq!(start.without("messages"), None);
    }

    #[test]
    fn openai_refusals_name_their_parameter() {
        let max_tokens = "Unsupported parameter: 'max_tokens' is not supported with this model. \
                          Use 'max_completion_tokens' instead.";
        assert_eq!(
            refused_parameter(
                400,
                Some("max_tokens"),
                Some("unsupported_parameter"),
                max_tokens
            ),
            Some("max_tokens")
        );
        assert_eq!(
            refused_parameter(400, None, None, max_tokens),
            Some("max_tokens")
        );
        let temperature = "Unsupported value: 'temperature' does not support 0.7 with this \
                           model. Only the default (1) value is supported.";
        assert_eq!(
            refused_parameter(
                400,
                Some("temperature"),
                Some("unsupported_value"),
                temperature
            ),
            Some("temperature")
        );
        let older = "Unrecognized request argument supplied: max_completion_tokens";
        assert_eq!(
            refused_parameter(400, None, None, older),
            Some("max_completion_tokens")
        );
    }

    #[test]
    fn other_errors_are_not_refusals() {
        let range = "Invalid 'temperature': decimal above maximum value.";
        assert_eq!(
            refused_parameter(
                400,
                Some("temperature"),
                Some("decimal_above_max_value"),
                range
            ),
            None
        );
        let unsupported = "Unsupported parameter: 'max_tokens'";
        assert_eq!(refused_parameter(500, None, None, unsupported), None);
        assert_eq!(refused_parameter(401, None, None, unsupported), None);
        assert_eq!(
            refused_parameter(400, Some("messages"), Some("unsupported_value"), "x"),
            None
        );
        assert_eq!(
            refused_parameter(400, None, None, "Unsupported model: gpt-9"),
            None
        );
    }
}
