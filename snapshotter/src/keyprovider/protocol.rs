//! ocicrypt's keyprovider protocol messages, as its Go types marshal them
//! (`github.com/containers/ocicrypt/keywrap/keyprovider`): JSON with byte strings in standard
//! base64, the same document over `cmd` (stdin to stdout) and `grpc` (inside one bytes field).

use std::collections::BTreeMap;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Go marshals `[]byte` as a base64 string and a nil slice as `null`.
mod go_bytes {
    use super::*;

    pub fn serialize<S: serde::Serializer>(
        bytes: &Option<Vec<u8>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => s.serialize_str(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        let text = text.map(Zeroizing::new);
        text.map(|t| {
            STANDARD
                .decode(t.as_bytes())
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

/// `config.EncryptConfig` / `config.DecryptConfig`: parameter name to values (Go's field names,
/// which carry no JSON tags).
#[derive(Serialize, Default)]
pub struct Parameters {
    #[serde(rename = "Parameters")]
    pub parameters: Option<BTreeMap<String, Vec<GoBytes>>>,
}

/// One `[]byte` value of a parameter list.
#[derive(Serialize)]
pub struct GoBytes(#[serde(with = "go_bytes")] pub Option<Vec<u8>>);

/// `config.EncryptConfig`.
#[derive(Serialize)]
pub struct EncryptConfig {
    #[serde(rename = "Parameters")]
    pub parameters: BTreeMap<String, Vec<GoBytes>>,
    #[serde(rename = "DecryptConfig")]
    pub decrypt_config: Parameters,
}

/// `KeyWrapParams`.
#[derive(Serialize, Default)]
pub struct KeyWrapParams {
    pub ec: Option<EncryptConfig>,
    #[serde(with = "go_bytes")]
    pub optsdata: Option<Vec<u8>>,
}

/// `KeyUnwrapParams`.
#[derive(Serialize, Default)]
pub struct KeyUnwrapParams {
    pub dc: Option<Parameters>,
    #[serde(with = "go_bytes")]
    pub annotation: Option<Vec<u8>>,
}

/// `KeyProviderKeyWrapProtocolInput`. Go's `omitempty` does not omit structs, so both
/// parameter objects are always sent, as ocicrypt sends them.
#[derive(Serialize)]
pub struct Input {
    pub op: &'static str,
    pub keywrapparams: KeyWrapParams,
    pub keyunwrapparams: KeyUnwrapParams,
}

/// `KeyWrapResults`.
#[derive(Deserialize, Default)]
pub struct KeyWrapResults {
    #[serde(with = "go_bytes", default)]
    pub annotation: Option<Vec<u8>>,
}

/// `KeyUnwrapResults`.
#[derive(Deserialize, Default)]
pub struct KeyUnwrapResults {
    #[serde(with = "go_bytes", default)]
    pub optsdata: Option<Vec<u8>>,
}

/// `KeyProviderKeyWrapProtocolOutput`.
#[derive(Deserialize, Default)]
pub struct Output {
    #[serde(default)]
    pub keywrapresults: KeyWrapResults,
    #[serde(default)]
    pub keyunwrapresults: KeyUnwrapResults,
}

impl Drop for Output {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        if let Some(key) = self.keyunwrapresults.optsdata.as_mut() {
            key.zeroize();
        }
    }
}

/// The `keywrap` request for `optsdata` (the layer key), with the recipient's parameters
/// (`provider:NAME:ARGS` gives `ARGS`; ocicrypt sends `Enabled` when there are none).
pub fn wrap_request(provider: &str, args: Option<&str>, optsdata: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut parameters = BTreeMap::new();
    parameters.insert(
        provider.to_string(),
        vec![GoBytes(Some(args.unwrap_or("Enabled").as_bytes().to_vec()))],
    );
    let input = Input {
        op: "keywrap",
        keywrapparams: KeyWrapParams {
            ec: Some(EncryptConfig {
                parameters,
                decrypt_config: Parameters::default(),
            }),
            optsdata: Some(optsdata.to_vec()),
        },
        keyunwrapparams: KeyUnwrapParams::default(),
    };
    let json = Zeroizing::new(serde_json::to_vec(&input).expect("plain JSON types"));
    if let Some(mut opts) = input.keywrapparams.optsdata {
        zeroize::Zeroize::zeroize(&mut opts);
    }
    json
}

/// The `keyunwrap` request for what provider `provider` answered when wrapping; the decrypt
/// parameters name the provider as ocicrypt's `provider:NAME` decryption key does.
pub fn unwrap_request(provider: &str, annotation: &[u8]) -> Vec<u8> {
    let mut parameters = BTreeMap::new();
    parameters.insert(
        provider.to_string(),
        vec![GoBytes(Some(b"Enabled".to_vec()))],
    );
    let input = Input {
        op: "keyunwrap",
        keywrapparams: KeyWrapParams::default(),
        keyunwrapparams: KeyUnwrapParams {
            dc: Some(Parameters {
                parameters: Some(parameters),
            }),
            annotation: Some(annotation.to_vec()),
        },
    };
    serde_json::to_vec(&input).expect("plain JSON types")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_have_ocicrypt_shape() {
        let wrap: serde_json::Value =
            serde_json::from_slice(&wrap_request("kms", None, b"key")).unwrap();
        assert_eq!(wrap["op"], "keywrap");
        assert_eq!(wrap["keywrapparams"]["optsdata"], STANDARD.encode("key"));
        assert_eq!(
            wrap["keywrapparams"]["ec"]["Parameters"]["kms"][0],
            STANDARD.encode("Enabled")
        );
        assert_eq!(
            wrap["keyunwrapparams"]["annotation"],
            serde_json::Value::Null
        );

        let unwrap: serde_json::Value =
            serde_json::from_slice(&unwrap_request("kms", b"wrapped")).unwrap();
        assert_eq!(unwrap["op"], "keyunwrap");
        assert_eq!(
            unwrap["keyunwrapparams"]["annotation"],
            STANDARD.encode("wrapped")
        );
        assert_eq!(
            unwrap["keyunwrapparams"]["dc"]["Parameters"]["kms"][0],
            STANDARD.encode("Enabled")
        );

        let answer: Output = serde_json::from_str(
            r#"{"keywrapresults":{"annotation":null},"keyunwrapresults":{"optsdata":"a2V5"}}"#,
        )
        .unwrap();
        assert_eq!(
            answer.keyunwrapresults.optsdata.as_deref(),
            Some(&b"key"[..])
        );
        assert!(
            serde_json::from_str::<Output>(r#"{"keyunwrapresults":{"optsdata":"%%"}}"#).is_err()
        );
    }
}
